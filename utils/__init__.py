"""The training spine shared by the trainers: arguments, data, samplers, schedules, AMP, checkpoints, logs."""
