"""Pipeline wiring (kfp): the `canao-compress` pipeline, its compiler, local runner and submitter."""
