"""Whole jobs over the layers below: the environment check (`doctor`), the main job on the
embedded default model (`quickstart`) and the model fitted to this machine for KoboldCpp
(`kobold_fit`: memory plan -> nkat mix -> .kcpps / server). Imports: every layer below `commands`."""
