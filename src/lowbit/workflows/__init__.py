"""lowbit.workflows: what a command does, as library functions the commands and the benchmarks call: quantize a
model as a plan says (``run``), compare formats, train, measure errors. Commands only parse and print."""
