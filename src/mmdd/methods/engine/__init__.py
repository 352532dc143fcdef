"""The engine every learned method runs on: its outer loop, settings, checkpoints and several processes."""
