"""Ray Tune sweeps where every trial is a full continual run: the sweep's driver and its winner
(:mod:`.sweep`), one trial's seeds run side by side (:mod:`.trial`), search-space files (:mod:`.search_space`)
and what a sweep adds to Tune (:mod:`.hooks`: how each trial ended, MLflow statuses, Optuna's "pruned").

Builds on :mod:`inflora_ray.ray_train` (a trial's runs are Ray Train runs); nothing else imports from here.
"""
