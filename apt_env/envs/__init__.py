"""The environment: ``APTPruneVectorEnv`` and ``APTPruneEnv`` (``env``), episodes (``episodes``), the observation
and the one stage walk (``observe``), argument checks (``arguments``, ``model_spec``), the mean budget's price
(``mean_budget``), rendering (``render``) and the stable-baselines3 adapter (``sb3_vec_env``)."""
