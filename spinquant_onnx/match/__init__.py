"""Pattern matching: find norms, linears, the residual stream and each weight's role from graph structure."""
