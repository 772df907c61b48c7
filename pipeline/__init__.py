"""dualpm-prep: Ray-parallel preprocessing (synthetic data, rendering, features) into sharded stores."""
