"""The per-example engine: layer rules, module hooks, per-example losses, gradients and features."""
