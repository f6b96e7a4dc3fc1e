"""Models: the configurable CNN and its presets, the architecture registry, transfer heads."""
