"""moerun.backends: the backend interface (base.py) and its implementations: cpu (reference), cuda, ascend."""
