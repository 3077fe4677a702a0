"""The built-in demo model's trainer (`make demo`, the tests' fixtures): a development tool, not
part of the edgepack package."""
