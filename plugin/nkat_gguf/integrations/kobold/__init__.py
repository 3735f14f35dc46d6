"""KoboldCpp: finding and probing the launcher, choosing a backend, writing .kcpps configs,
starting KoboldCpp (or the llama-cpp-python server) and checking that it answers."""
