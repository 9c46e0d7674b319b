"""`moerun verify`: black-box checks of an OpenAI-compatible endpoint against a fingerprint manifest's reference
probes (logprob fidelity, template token counts, tool calling, reasoning), each judged against what the manifest
records of a trusted configuration (docs/fidelity.md)."""
