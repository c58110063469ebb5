"""Reading a training run's output folder: curves (plot.py) and a rollout viewer page (viewer.py)."""
