"""The Huawei Ascend NPU backend (torch_npu), and a CPU emulation of the torch_npu ops it calls (`emulate: true`)."""
