"""`emulator validate`: the emulator and the simulator (host profile, same dilation, same
scheduler settings) on one trace and layout, joined step by step, with the errors of the
simulator's medians, the noise floor of the measurements and a verdict (DESIGN section 7)."""
