"""Files: GGUF models (reading, assembling mixed files, merging theta into weights), the .nkat adapter,
imatrix and covariance statistics files, the packaged default models and texts.
Imports: gguf-py, numpy, `errors`, `util`. Nothing of llama.cpp, nothing above."""
