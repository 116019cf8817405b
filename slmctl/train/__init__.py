"""Training: Lightning modules, data modules and the stages built on them."""
