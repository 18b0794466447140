# The CPU base image (images/base); kept in step with PipelineSpec.image's default.
BASE_IMAGE = "ghcr.io/ruyi-flow/ruyi-base:0.1.0"
