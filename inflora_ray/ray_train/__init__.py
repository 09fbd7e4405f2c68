"""One run as a Ray Train job: the driver (:mod:`.launch`: checks, the job, the results), the workers
(:mod:`.worker`: one :class:`~inflora_ray.training.learner.ContinualLearner` per data-parallel rank), the
trainer and process group they run on (:mod:`.trainer`, :mod:`.process_group`), errors no restart can fix
(:mod:`.errors`), continuing a run (:mod:`.resume`), the console lines (:mod:`.progress`), several seeds at
once (:mod:`.seeds`) and the tests' fault injection (:mod:`.faults`).

Calls into :mod:`inflora_ray.training` and :mod:`inflora_ray.core`; nothing below imports from here.
"""
