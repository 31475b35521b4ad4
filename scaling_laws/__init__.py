"""Scaling laws as a tool (arXiv 2404.02905, section 4): a family of models (sweep), the power-law fit and compute
frontier (fit), N and C of each member (members), the tables (report) and the figure (plot). scaling.py is the
command line over them."""
