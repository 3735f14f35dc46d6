"""Whole jobs over the layers below: the environment check (`doctor`) and the main job on the
embedded default model (`quickstart`). Imports: every layer below `commands`."""
