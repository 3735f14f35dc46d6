"""llama.cpp at work: a model with theta attached (lora | shim), the cffi binding of the native
kernels and eval-callback hook, quantization, activation and covariance calibration runs
(one `calibrate`).
Imports: llama-cpp-python, the native module, `errors`, `util`, `formats`. Computes no SVDs."""
