"""Neural network models: frozen feature backbones (and the mappers, elsewhere)."""
