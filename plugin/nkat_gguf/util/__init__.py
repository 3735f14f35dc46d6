"""Small helpers every layer may use: atomic writes, signals, console and JSON reporting, output-path
checks, URL redaction. Imports: the standard library and `nkat_gguf.errors` only."""
