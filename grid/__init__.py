"""The experiment grid: Ray and MLflow at the edge, calling the stage functions of `slam`."""
