"""Trajectory matching (MTT-VL, TESLA-VL, LoRS, RepBlend, PTM-ST): the objective, its meta-gradients, the unrolled
inner steps, phases, the draws of each iteration and the shortcut (convexified) trajectory."""
