"""Local, protocol-true fakes of the ad platforms (demo target and test servers)."""
