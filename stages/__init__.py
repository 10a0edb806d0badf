"""The pipeline stages, one module each: teacher, distill, prune, qat, export, compile."""
