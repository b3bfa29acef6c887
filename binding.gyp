{
  "targets": [
    {
      "target_name": "vhost_user",
      "sources": ["native/vhost_user.cc"],
      # No -std flag: Node's own common.gypi sets the C++ standard its V8 headers need (gnu++17 up to Node 22,
      # gnu++20 from Node 24 on, whose headers refuse anything older).
      "cflags_cc": ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-cast-function-type"],
      "cflags_cc!": ["-fno-exceptions"]
    }
  ]
}
