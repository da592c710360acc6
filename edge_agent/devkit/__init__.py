"""Development tooling: the demo, device and PLC simulators, test brokers, a throwaway CA, the model benchmark.

Imported by the CLI only for the verbs that need it (`demo`, `bench`) and by the tests; the daemon's modules never
import it.
"""
