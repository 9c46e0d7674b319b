"""The OpenAI protocol of `moerun serve`: request validation, the mapping to the engine's sampling parameters,
response and stream-chunk builders, OpenAI error JSON, and the HTTP guards (API key, body size)."""
