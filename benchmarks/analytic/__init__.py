"""Analytic models checked against measurement: FLOP counts with the devices' peaks, and memory per GPU."""
