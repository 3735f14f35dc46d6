"""Theta: the math (`lowrank`: sources, structures, truncated and whitened SVD, rank allocation;
numpy in, numpy out, imports only `errors`), the one pipeline that joins it to the files of
`formats` (`pipeline`: statistics, the factor loop, byte pricing, the rank choice, the metadata),
and `convert`, nkat convert over that pipeline (a GGUF model in, a .nkat adapter out).
Imports: `errors`, `util`, `formats`."""
