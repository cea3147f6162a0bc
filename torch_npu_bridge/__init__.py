"""Export of this project's predictors to a torch / torch_npu executor (CANN on Ascend NPUs; CUDA or CPU torch
elsewhere). Built with the torch_npu bridge issue."""
