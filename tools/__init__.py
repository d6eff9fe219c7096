"""Support for the tests and benchmarks, not part of the method: ``scratch_project`` (a
``git clone`` of this repository to run the pipeline in) and ``paper_models`` (randomly
initialised models with the published architectures)."""
