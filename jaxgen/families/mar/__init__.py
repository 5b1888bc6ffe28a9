"""MAR family: model, training loss, sampler and mask schedule."""
