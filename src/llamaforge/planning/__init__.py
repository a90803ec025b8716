"""The estimator behind `llamaforge plan`: architectures, activation bill, peak memory, throughput.

`planning.plan` assembles these into a plan for one model, one job and one machine.
"""
