"""moerun.runtime: the device-agnostic MiniMax-M2 graph, its loader, engine and command line."""
