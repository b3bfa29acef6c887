{
  "targets": [
    {
      "target_name": "vhost_user",
      "sources": ["native/vhost_user.cc"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-cast-function-type"],
      "cflags_cc!": ["-fno-exceptions"]
    }
  ]
}
