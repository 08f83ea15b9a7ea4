"""Ray Tune search spaces as YAML files (see the README); filled in by `mlo-mae tune`."""
