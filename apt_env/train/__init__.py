"""Training: the joint phases' channel losses (``joint``), train state and resume (``state``), run folders (``runs``),
atomic writes (``atomic``) and data-parallel helpers (``distributed``)."""
