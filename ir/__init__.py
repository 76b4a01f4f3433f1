"""milsparse.ir: formats, masks and read-only program views. Never mutates a MIL program."""
