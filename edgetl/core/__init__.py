"""The torch-free core both sides share: errors, the format table, the bundle manifest, images and
preprocessing, shipped YAML files, machine facts. It imports nothing from the other edgetl packages."""
