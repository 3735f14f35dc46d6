"""Theta: the math (`lowrank`: sources, structures, truncated and whitened SVD, rank allocation;
numpy in, numpy out, imports only `errors`) and `convert`, which joins that math to the files of
`formats` (a GGUF model in, a .nkat adapter out). Imports: `errors`, `util`, `formats`."""
