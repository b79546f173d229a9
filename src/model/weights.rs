//! Reading named weight tensors from PyTorch checkpoints and safetensors files.
