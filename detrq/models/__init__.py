"""DETR in the official module tree and parameter names (presets r50, mini, tiny), its criterion and box ops,
and loading a preset with its checkpoint."""
