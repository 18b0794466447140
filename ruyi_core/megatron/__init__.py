"""The familial model on megatron-core: model, HF <-> megatron conversion, 3D-parallel trainer, CPU shim."""
