// The syscalls Node lacks, and nothing else: memfd and seals, mmap into a real SharedArrayBuffer, revoke, unix
// sockets with SCM_RIGHTS driven by the calling thread's event loop, eventfd, poll, TAP devices, and a bounds-checked
// memmove between buffers (V8 copies into shared memory byte by byte when the two sides are misaligned). All logic lives in
// TypeScript (src/native/index.ts documents each function).
//
// Every failure throws a JS Error shaped like Node's system errors: `code` ('EBADF'), `errno` (positive), `syscall`.
// The module is context-aware (NODE_MODULE_INIT) so worker threads can load it; per-thread state (fd watchers)
// lives in an AddonData that an environment cleanup hook tears down when the thread's environment goes away.

#include <node.h>
#include <uv.h>
#include <v8.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#ifndef MFD_CLOEXEC
#include <linux/memfd.h>
#endif
#ifndef F_ADD_SEALS
#include <linux/fcntl.h>
#endif

using v8::Array;
using v8::ArrayBuffer;
using v8::ArrayBufferView;
using v8::BigInt;
using v8::Context;
using v8::Exception;
using v8::External;
using v8::Function;
using v8::FunctionCallbackInfo;
using v8::FunctionTemplate;
using v8::Global;
using v8::HandleScope;
using v8::Int32Array;
using v8::Integer;
using v8::Isolate;
using v8::Local;
using v8::Number;
using v8::Object;
using v8::SharedArrayBuffer;
using v8::String;
using v8::Uint8Array;
using v8::Value;

namespace {

constexpr int kMaxFds = 32;

// ---------------------------------------------------------------------------------------------------------------
// Errors

Local<String> Str(Isolate* isolate, const char* s) {
  return String::NewFromUtf8(isolate, s).ToLocalChecked();
}

void ThrowErrno(Isolate* isolate, int err, const char* syscall) {
  Local<Context> context = isolate->GetCurrentContext();
  const char* code = uv_err_name(-err);
  std::string message = std::string(syscall) + " " + code + ": " + strerror(err);
  Local<Object> error = Exception::Error(Str(isolate, message.c_str())).As<Object>();
  error->Set(context, Str(isolate, "code"), Str(isolate, code)).Check();
  error->Set(context, Str(isolate, "errno"), Integer::New(isolate, err)).Check();
  error->Set(context, Str(isolate, "syscall"), Str(isolate, syscall)).Check();
  isolate->ThrowException(error);
}

// An argument error: EINVAL-shaped so callers see one error format.
void ThrowInvalid(Isolate* isolate, const char* syscall, const char* what) {
  Local<Context> context = isolate->GetCurrentContext();
  std::string message = std::string(syscall) + " EINVAL: " + what;
  Local<Object> error = Exception::TypeError(Str(isolate, message.c_str())).As<Object>();
  error->Set(context, Str(isolate, "code"), Str(isolate, "EINVAL")).Check();
  error->Set(context, Str(isolate, "errno"), Integer::New(isolate, EINVAL)).Check();
  error->Set(context, Str(isolate, "syscall"), Str(isolate, syscall)).Check();
  isolate->ThrowException(error);
}

// v8::External takes a type tag since V8 14.6 (Node 26), which deprecates the untagged New() and Value(); the tagged
// calls do not exist before. AddonData is the only External this addon makes.
#if V8_MAJOR_VERSION > 14 || (V8_MAJOR_VERSION == 14 && V8_MINOR_VERSION >= 6)
Local<External> NewExternal(Isolate* isolate, void* value) {
  return External::New(isolate, value, v8::kExternalPointerTypeTagDefault);
}
void* ExternalValue(Local<Value> value) {
  return value.As<External>()->Value(v8::kExternalPointerTypeTagDefault);
}
#else
Local<External> NewExternal(Isolate* isolate, void* value) {
  return External::New(isolate, value);
}
void* ExternalValue(Local<Value> value) {
  return value.As<External>()->Value();
}
#endif

bool ArgInt(const FunctionCallbackInfo<Value>& info, int i, const char* syscall, int* out) {
  if (!info[i]->IsInt32()) {
    ThrowInvalid(info.GetIsolate(), syscall, "expected an integer argument");
    return false;
  }
  *out = info[i].As<v8::Int32>()->Value();
  return true;
}

// A non-negative integer up to 2^53 given as a number or a bigint.
bool ArgSize(const FunctionCallbackInfo<Value>& info, int i, const char* syscall, uint64_t* out) {
  if (info[i]->IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[i].As<BigInt>()->Uint64Value(&lossless);
    if (!lossless) {
      ThrowInvalid(info.GetIsolate(), syscall, "size out of range");
      return false;
    }
    *out = v;
    return true;
  }
  if (info[i]->IsNumber()) {
    double d = info[i].As<Number>()->Value();
    if (d >= 0 && d <= 9007199254740991.0 && d == static_cast<double>(static_cast<uint64_t>(d))) {
      *out = static_cast<uint64_t>(d);
      return true;
    }
  }
  ThrowInvalid(info.GetIsolate(), syscall, "expected a non-negative integer size");
  return false;
}

// ---------------------------------------------------------------------------------------------------------------
// Guest memory: memfd, mmap into a SharedArrayBuffer, revoke.
//
// Every live mapping is recorded in a process-wide registry (mutex-protected): revoke() only accepts buffers made
// by mapShared(), and tests count live mappings. The backing-store deleter runs when the last isolate drops the
// buffer, on any thread (often a V8 background thread): it only touches the registry and munmaps.

struct Mapping {
  size_t length;
  bool revoked;
};

std::mutex g_mappings_mutex;
std::map<void*, Mapping>* g_mappings = new std::map<void*, Mapping>();  // never freed: deleters may run at exit

void MappingDeleter(void* data, size_t length, void* /*deleter_data*/) {
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  g_mappings->erase(data);
  munmap(data, length);
}

void MemfdCreate(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  uint64_t size;
  if (!info[0]->IsString()) return ThrowInvalid(isolate, "memfd_create", "name must be a string");
  if (!ArgSize(info, 1, "memfd_create", &size)) return;
  String::Utf8Value name(isolate, info[0]);
  int fd = memfd_create(*name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return ThrowErrno(isolate, errno, "memfd_create");
  if (ftruncate(fd, static_cast<off_t>(size)) < 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, err, "ftruncate");
  }
  info.GetReturnValue().Set(fd);
}

// mapShared(fd, offset, length, writable) -> SharedArrayBuffer
// The file must already cover [offset, offset + length): touching a mapped page past the end of its file raises
// SIGBUS, which would kill the process, so this is checked here (fstat) before mapping.
void MapShared(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  int fd;
  uint64_t offset, length;
  if (!ArgInt(info, 0, "mmap", &fd) || !ArgSize(info, 1, "mmap", &offset) || !ArgSize(info, 2, "mmap", &length))
    return;
  bool writable = info[3]->IsTrue();
  long page = sysconf(_SC_PAGESIZE);
  if (length == 0) return ThrowInvalid(isolate, "mmap", "length must be > 0");
  if (offset % static_cast<uint64_t>(page) != 0) return ThrowInvalid(isolate, "mmap", "offset not page-aligned");
  struct stat st;
  if (fstat(fd, &st) < 0) return ThrowErrno(isolate, errno, "fstat");
  if (offset + length < offset || static_cast<uint64_t>(st.st_size) < offset + length) {
    return ThrowErrno(isolate, ENXIO, "mmap");  // the mapping would extend past the end of the file
  }
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* addr = mmap(nullptr, length, prot, MAP_SHARED | MAP_NORESERVE, fd, static_cast<off_t>(offset));
  if (addr == MAP_FAILED) return ThrowErrno(isolate, errno, "mmap");
  {
    std::lock_guard<std::mutex> lock(g_mappings_mutex);
    (*g_mappings)[addr] = Mapping{length, false};
  }
  std::unique_ptr<v8::BackingStore> store =
      SharedArrayBuffer::NewBackingStore(addr, length, MappingDeleter, nullptr);
  info.GetReturnValue().Set(SharedArrayBuffer::New(isolate, std::move(store)));
}

// revoke(sab): replace a mapShared() mapping in place with private anonymous memory. Views that still exist (in any
// thread) then read zeros and write to memory nobody else sees; the file's pages are no longer referenced by this
// mapping. Idempotent.
void Revoke(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  if (!info[0]->IsSharedArrayBuffer()) return ThrowInvalid(isolate, "revoke", "expected a SharedArrayBuffer");
  std::shared_ptr<v8::BackingStore> store = info[0].As<SharedArrayBuffer>()->GetBackingStore();
  void* addr = store->Data();
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  auto it = g_mappings->find(addr);
  if (it == g_mappings->end() || it->second.length != store->ByteLength()) {
    return ThrowInvalid(isolate, "revoke", "not a buffer made by mapShared()");
  }
  if (it->second.revoked) return;
  void* r = mmap(addr, it->second.length, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return ThrowErrno(isolate, errno, "mmap");
  it->second.revoked = true;
}

// mappingCount() -> number of live mapShared() mappings in the process (revoked ones included until unmapped).
void MappingCount(const FunctionCallbackInfo<Value>& info) {
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  info.GetReturnValue().Set(static_cast<double>(g_mappings->size()));
}

// isRevoked(sab) -> boolean
void IsRevoked(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  if (!info[0]->IsSharedArrayBuffer()) return ThrowInvalid(isolate, "revoke", "expected a SharedArrayBuffer");
  void* addr = info[0].As<SharedArrayBuffer>()->GetBackingStore()->Data();
  std::lock_guard<std::mutex> lock(g_mappings_mutex);
  auto it = g_mappings->find(addr);
  info.GetReturnValue().Set(it != g_mappings->end() && it->second.revoked);
}

// fstat(fd) -> { size: number, dev: bigint, ino: bigint, mode: number }
void Fstat(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  int fd;
  if (!ArgInt(info, 0, "fstat", &fd)) return;
  struct stat st;
  if (fstat(fd, &st) < 0) return ThrowErrno(isolate, errno, "fstat");
  Local<Object> out = Object::New(isolate);
  out->Set(context, Str(isolate, "size"), Number::New(isolate, static_cast<double>(st.st_size))).Check();
  out->Set(context, Str(isolate, "dev"), BigInt::NewFromUnsigned(isolate, st.st_dev)).Check();
  out->Set(context, Str(isolate, "ino"), BigInt::NewFromUnsigned(isolate, st.st_ino)).Check();
  out->Set(context, Str(isolate, "mode"), Integer::NewFromUnsigned(isolate, st.st_mode)).Check();
  info.GetReturnValue().Set(out);
}

void Close(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "close", &fd)) return;
  // close() must not be retried on EINTR on Linux: the fd is released either way.
  if (close(fd) < 0 && errno != EINTR) return ThrowErrno(info.GetIsolate(), errno, "close");
}

void Dup(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "dup", &fd)) return;
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (r < 0) return ThrowErrno(info.GetIsolate(), errno, "dup");
  info.GetReturnValue().Set(r);
}

// getSeals(fd) -> the file's seal bits (F_GET_SEALS), or -1 when the file does not support sealing (anything but a
// memfd/shmem or hugetlbfs file: the kernel answers EINVAL). A shmem file that was not created sealable reports
// F_SEAL_SEAL.
void GetSeals(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "fcntl", &fd)) return;
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) return info.GetReturnValue().Set(-1);
    return ThrowErrno(info.GetIsolate(), errno, "fcntl");
  }
  info.GetReturnValue().Set(seals);
}

// addSeals(fd, seals): F_ADD_SEALS. EPERM when the file is sealed against new seals (F_SEAL_SEAL), EBUSY for
// F_SEAL_WRITE while a writable shared mapping exists, EINVAL for a file that does not support sealing.
void AddSeals(const FunctionCallbackInfo<Value>& info) {
  int fd, seals;
  if (!ArgInt(info, 0, "fcntl", &fd) || !ArgInt(info, 1, "fcntl", &seals)) return;
  if (fcntl(fd, F_ADD_SEALS, seals) < 0) return ThrowErrno(info.GetIsolate(), errno, "fcntl");
}

// ---------------------------------------------------------------------------------------------------------------
// eventfd and poll (worker datapath)

// eventfd(initval, nonblocking) -> fd
void EventfdCreate(const FunctionCallbackInfo<Value>& info) {
  int initval;
  if (!ArgInt(info, 0, "eventfd", &initval)) return;
  int flags = EFD_CLOEXEC | (info[1]->IsTrue() ? EFD_NONBLOCK : 0);
  int fd = eventfd(static_cast<unsigned>(initval), flags);
  if (fd < 0) return ThrowErrno(info.GetIsolate(), errno, "eventfd");
  info.GetReturnValue().Set(fd);
}

// Polls one fd without waiting; returns poll's revents, or -1 with errno set (EINTR retried).
int PollNow(int fd, short events) {
  struct pollfd p = {fd, events, 0};
  int ready;
  do ready = poll(&p, 1, 0);
  while (ready < 0 && errno == EINTR);
  return ready < 0 ? -1 : p.revents;
}

// isEventfd(fd) -> true when fd is an eventfd. The kernel names an eventfd's file "anon_inode:[eventfd]" (its
// /proc/self/fd link); fstat cannot tell (every anonymous inode shares one inode). EBADF for a closed fd.
void IsEventfd(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "readlink", &fd)) return;
  if (fcntl(fd, F_GETFD) < 0) return ThrowErrno(info.GetIsolate(), errno, "fcntl");
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  char target[64];
  ssize_t n = readlink(path, target, sizeof target - 1);
  if (n < 0) return ThrowErrno(info.GetIsolate(), errno, "readlink");
  target[n] = '\0';
  info.GetReturnValue().Set(strcmp(target, "anon_inode:[eventfd]") == 0);
}

// eventfdRead(fd) -> counter value (number), or 0 when the eventfd was not signalled. Never blocks, even on a
// blocking eventfd (as a VMM's kick fd may be, possibly shared by two queues or read by the VMM too).
void EventfdRead(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "read", &fd)) return;
  int revents = PollNow(fd, POLLIN);
  if (revents < 0) return ThrowErrno(info.GetIsolate(), errno, "poll");
  if (revents & POLLNVAL) return ThrowErrno(info.GetIsolate(), EBADF, "read");
  if (!(revents & (POLLIN | POLLERR | POLLHUP))) return info.GetReturnValue().Set(0);
  uint64_t value = 0;
  ssize_t n;
  do n = read(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return info.GetReturnValue().Set(0);
    return ThrowErrno(info.GetIsolate(), errno, "read");
  }
  if (n != sizeof value) return ThrowErrno(info.GetIsolate(), EIO, "read");
  info.GetReturnValue().Set(static_cast<double>(value));
}

// timerfdCreate() -> fd: a CLOCK_MONOTONIC timerfd (non-blocking, close-on-exec), disarmed. It becomes readable when
// it expires; eventfdRead() reads and resets it (a timerfd reads as a u64 count, as an eventfd does), so a worker can
// wait on it in poll() like on any completion fd.
void TimerfdCreate(const FunctionCallbackInfo<Value>& info) {
  int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd < 0) return ThrowErrno(info.GetIsolate(), errno, "timerfd_create");
  info.GetReturnValue().Set(fd);
}

// timerfdArm(fd, ms): one expiry `ms` milliseconds from now (a number >= 0; 0 disarms it).
void TimerfdArm(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  int fd;
  if (!ArgInt(info, 0, "timerfd_settime", &fd)) return;
  if (!info[1]->IsNumber()) return ThrowInvalid(isolate, "timerfd_settime", "expected milliseconds");
  double ms = info[1].As<Number>()->Value();
  if (!(ms >= 0 && ms <= 86400000.0)) return ThrowInvalid(isolate, "timerfd_settime", "milliseconds must be 0..86400000");
  struct itimerspec spec;
  memset(&spec, 0, sizeof spec);
  long long ns = static_cast<long long>(ms * 1e6);
  if (ms > 0 && ns == 0) ns = 1;  // a positive delay must not disarm
  spec.it_value.tv_sec = static_cast<time_t>(ns / 1000000000LL);
  spec.it_value.tv_nsec = static_cast<long>(ns % 1000000000LL);
  if (timerfd_settime(fd, 0, &spec, nullptr) < 0) return ThrowErrno(isolate, errno, "timerfd_settime");
}

// eventfdWrite(fd, value = 1). Never blocks, even on a blocking eventfd (as a VMM's call fd may be): a counter that
// cannot take `value` (at its maximum) already means "signalled", so that write is skipped, not an error.
void EventfdWrite(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "write", &fd)) return;
  uint64_t value = 1;
  if (info.Length() > 1 && !info[1]->IsUndefined() && !ArgSize(info, 1, "write", &value)) return;
  int revents = PollNow(fd, POLLOUT);
  if (revents < 0) return ThrowErrno(info.GetIsolate(), errno, "poll");
  if (revents & POLLNVAL) return ThrowErrno(info.GetIsolate(), EBADF, "write");
  if (!(revents & POLLOUT)) return;  // full: the reader has not consumed the earlier signal yet
  ssize_t n;
  do n = write(fd, &value, sizeof value);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno != EAGAIN) return ThrowErrno(info.GetIsolate(), errno, "write");
}

// poll(fds: Int32Array, revents: Int32Array, timeoutMs) -> number of ready fds (0 on timeout). Waits for POLLIN on
// each fd; an fd < 0 is ignored (as poll(2) does). revents[i] receives poll's revents bits for fds[i]. Blocks the
// calling thread: for worker threads. A signal (EINTR) returns 0, as a timeout would.
void Poll(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  if (!info[0]->IsInt32Array() || !info[1]->IsInt32Array()) {
    return ThrowInvalid(isolate, "poll", "expected (Int32Array fds, Int32Array revents, timeoutMs)");
  }
  int timeout;
  if (!ArgInt(info, 2, "poll", &timeout)) return;
  Local<Int32Array> fds = info[0].As<Int32Array>();
  Local<Int32Array> revents = info[1].As<Int32Array>();
  size_t n = fds->Length();
  if (revents->Length() < n) return ThrowInvalid(isolate, "poll", "revents shorter than fds");
  if (n > 1024) return ThrowInvalid(isolate, "poll", "too many fds");
  int32_t fdv[1024];
  fds->CopyContents(fdv, n * sizeof(int32_t));
  struct pollfd pfd[1024];
  for (size_t i = 0; i < n; i++) pfd[i] = {fdv[i], POLLIN, 0};
  int r = poll(pfd, n, timeout);
  if (r < 0) {
    if (errno == EINTR) r = 0;
    else return ThrowErrno(isolate, errno, "poll");
  }
  int32_t out[1024];
  for (size_t i = 0; i < n; i++) out[i] = r > 0 ? pfd[i].revents : 0;
  // Write through the typed array's backing store (revents is an ordinary Int32Array owned by the caller).
  std::shared_ptr<v8::BackingStore> store = revents->Buffer()->GetBackingStore();
  memcpy(static_cast<char*>(store->Data()) + revents->ByteOffset(), out, n * sizeof(int32_t));
  info.GetReturnValue().Set(r);
}

// ---------------------------------------------------------------------------------------------------------------
// Copying bytes between buffers

// The bytes of a SharedArrayBuffer, an ArrayBuffer or a view of either (a detached buffer has none: null, 0).
bool BufferBytes(Local<Value> v, uint8_t** data, size_t* length) {
  if (v->IsArrayBufferView()) {
    Local<ArrayBufferView> view = v.As<ArrayBufferView>();
    Local<ArrayBuffer> buffer = view->Buffer();  // a shared view's buffer is the SharedArrayBuffer (same object kind)
    *data = static_cast<uint8_t*>(buffer->Data()) + view->ByteOffset();
    *length = view->ByteLength();
    return *data != nullptr || *length == 0;
  }
  if (v->IsSharedArrayBuffer()) {
    Local<SharedArrayBuffer> sab = v.As<SharedArrayBuffer>();
    *data = static_cast<uint8_t*>(sab->Data());
    *length = sab->ByteLength();
    return true;
  }
  if (v->IsArrayBuffer()) {
    Local<ArrayBuffer> ab = v.As<ArrayBuffer>();
    *data = static_cast<uint8_t*>(ab->Data());
    *length = ab->ByteLength();
    return true;
  }
  return false;
}

// copy(dst, dstOffset, src, srcOffset, length): memmove of `length` bytes between two buffers (SharedArrayBuffer,
// ArrayBuffer or a view; offsets relative to the view), or within one. Every bound is checked first: a bad one
// throws and copies nothing. No allocation. Guest memory may change under the copy: the copy then holds a mix of
// old and new bytes, which is all a guest racing its own buffers can ask for (the kernel's copy_from_user is the same).
void Copy(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  uint8_t* dst;
  uint8_t* src;
  size_t dstLength, srcLength;
  if (!BufferBytes(info[0], &dst, &dstLength) || !BufferBytes(info[2], &src, &srcLength)) {
    return ThrowInvalid(isolate, "copy", "expected an ArrayBuffer, a SharedArrayBuffer or a view");
  }
  if (!info[1]->IsUint32() || !info[3]->IsUint32() || !info[4]->IsUint32()) {
    return ThrowInvalid(isolate, "copy", "offsets and length must be integers 0..2^32-1");
  }
  size_t dstOffset = info[1].As<v8::Uint32>()->Value();
  size_t srcOffset = info[3].As<v8::Uint32>()->Value();
  size_t length = info[4].As<v8::Uint32>()->Value();
  if (dstOffset > dstLength || length > dstLength - dstOffset || srcOffset > srcLength ||
      length > srcLength - srcOffset) {
    return ThrowInvalid(isolate, "copy", "range outside the buffer");
  }
  if (length != 0) memmove(dst + dstOffset, src + srcOffset, length);
}

// ---------------------------------------------------------------------------------------------------------------
// TAP devices

// tunOpen(name, multiQueue, vnetHdr) -> { fd, name }: opens /dev/net/tun (non-blocking, close-on-exec) and attaches
// it to the TAP interface `name` (created if missing; "" lets the kernel pick a name such as "tap0"), without the
// packet-information header: each read() returns one Ethernet frame, each write() sends one; with `vnetHdr`, each
// behind a 12-byte virtio-net header (IFF_VNET_HDR, TUNSETVNETHDRSZ 12). The interface is not
// persistent: it goes away when its last queue fd is closed. `name` is the kernel's final interface name.
void TunOpen(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  if (!info[0]->IsString()) return ThrowInvalid(isolate, "ioctl", "name must be a string");
  String::Utf8Value name(isolate, info[0]);
  // Utf8Value::length() is an int before V8 13 (Node 24) and a size_t since: compare as size_t (never negative).
  size_t length = static_cast<size_t>(name.length());
  if (length >= IFNAMSIZ || strlen(*name) != length) {
    return ThrowInvalid(isolate, "ioctl", "interface name must be shorter than 16 bytes, without NUL");
  }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  memcpy(ifr.ifr_name, *name, length);
  bool vnetHdr = info[2]->IsTrue();
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (info[1]->IsTrue() ? IFF_MULTI_QUEUE : 0) | (vnetHdr ? IFF_VNET_HDR : 0);
  int fd;
  do fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) return ThrowErrno(isolate, errno, "open");
  // With a virtio-net header, use the 12-byte one (with num_buffers) that VERSION_1 drivers use, not the default 10.
  int hdrSize = 12;
  if (ioctl(fd, TUNSETIFF, &ifr) < 0 || (vnetHdr && ioctl(fd, TUNSETVNETHDRSZ, &hdrSize) < 0)) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, err, "ioctl");
  }
  char actual[IFNAMSIZ + 1];
  memcpy(actual, ifr.ifr_name, IFNAMSIZ);
  actual[IFNAMSIZ] = '\0';
  Local<Object> out = Object::New(isolate);
  out->Set(context, Str(isolate, "fd"), Integer::New(isolate, fd)).Check();
  out->Set(context, Str(isolate, "name"), Str(isolate, actual)).Check();
  info.GetReturnValue().Set(out);
}

// tunSetOffload(fd, flags): TUNSETOFFLOAD with TUN_F_* bits: the offloads the reader of a vnet-header TAP takes
// (what it lacks, the kernel completes before the frame reaches read()). Unknown bits fail with EINVAL.
void TunSetOffload(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  int fd, flags;
  if (!ArgInt(info, 0, "ioctl", &fd) || !ArgInt(info, 1, "ioctl", &flags)) return;
  if (ioctl(fd, TUNSETOFFLOAD, static_cast<unsigned long>(static_cast<unsigned>(flags))) < 0) {
    return ThrowErrno(isolate, errno, "ioctl");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Unix stream sockets with SCM_RIGHTS. All sockets are non-blocking and close-on-exec.

bool FillSockaddr(Isolate* isolate, Local<Value> path, struct sockaddr_un* addr, const char* syscall) {
  if (!path->IsString()) {
    ThrowInvalid(isolate, syscall, "path must be a string");
    return false;
  }
  String::Utf8Value p(isolate, path);
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (p.length() <= 0 || static_cast<size_t>(p.length()) >= sizeof addr->sun_path) {
    ThrowErrno(isolate, ENAMETOOLONG, syscall);
    return false;
  }
  memcpy(addr->sun_path, *p, p.length());
  return true;
}

// listen(path, backlog) -> fd
void Listen(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  struct sockaddr_un addr;
  int backlog;
  if (!FillSockaddr(isolate, info[0], &addr, "bind") || !ArgInt(info, 1, "listen", &backlog)) return;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowErrno(isolate, errno, "socket");
  if (bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) < 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, err, "bind");
  }
  if (listen(fd, backlog) < 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, err, "listen");
  }
  info.GetReturnValue().Set(fd);
}

// accept(listenFd) -> fd, or -1 when no connection is pending
void Accept(const FunctionCallbackInfo<Value>& info) {
  int fd;
  if (!ArgInt(info, 0, "accept4", &fd)) return;
  int r;
  do r = accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == ECONNABORTED) return info.GetReturnValue().Set(-1);
    return ThrowErrno(info.GetIsolate(), errno, "accept4");
  }
  info.GetReturnValue().Set(r);
}

// connect(path) -> fd (connected, then switched to non-blocking)
void Connect(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  struct sockaddr_un addr;
  if (!FillSockaddr(isolate, info[0], &addr, "connect")) return;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowErrno(isolate, errno, "socket");
  int r;
  do r = connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(isolate, err, "connect");
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  info.GetReturnValue().Set(fd);
}

// socketPair() -> [fd, fd]
void SocketPair(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
    return ThrowErrno(isolate, errno, "socketpair");
  }
  Local<Array> out = Array::New(isolate, 2);
  out->Set(isolate->GetCurrentContext(), 0, Integer::New(isolate, sv[0])).Check();
  out->Set(isolate->GetCurrentContext(), 1, Integer::New(isolate, sv[1])).Check();
  info.GetReturnValue().Set(out);
}

// recvmsg(fd, buffer: Uint8Array, fdsOut: number[]) -> bytes read (0 = peer closed), or -1 when nothing is ready.
// Received fds (close-on-exec) are pushed onto fdsOut. A control message truncated by the kernel (more than 32 fds)
// closes what arrived and throws ETOOMANYREFS-shaped EMSGSIZE.
void RecvMsg(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  int fd;
  if (!ArgInt(info, 0, "recvmsg", &fd)) return;
  if (!info[1]->IsUint8Array() || !info[2]->IsArray()) {
    return ThrowInvalid(isolate, "recvmsg", "expected (fd, Uint8Array, fds array)");
  }
  Local<Uint8Array> buf = info[1].As<Uint8Array>();
  Local<Array> fdsOut = info[2].As<Array>();
  std::shared_ptr<v8::BackingStore> store = buf->Buffer()->GetBackingStore();
  struct iovec iov = {static_cast<char*>(store->Data()) + buf->ByteOffset(), buf->ByteLength()};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return info.GetReturnValue().Set(-1);
    return ThrowErrno(isolate, errno, "recvmsg");
  }
  std::vector<int> received;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const int* p = reinterpret_cast<const int*>(CMSG_DATA(c));
    for (size_t i = 0; i < count; i++) {
      int rfd;
      memcpy(&rfd, p + i, sizeof rfd);
      received.push_back(rfd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    for (int rfd : received) close(rfd);
    return ThrowErrno(isolate, EMSGSIZE, "recvmsg");
  }
  uint32_t base = fdsOut->Length();
  for (size_t i = 0; i < received.size(); i++) {
    fdsOut->Set(context, base + static_cast<uint32_t>(i), Integer::New(isolate, received[i])).Check();
  }
  info.GetReturnValue().Set(static_cast<double>(n));
}

// sendmsg(fd, buffer: Uint8Array, fds: number[]) -> bytes sent, or -1 when the socket buffer is full.
// MSG_NOSIGNAL: a peer that went away gives EPIPE, never SIGPIPE.
void SendMsg(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Local<Context> context = isolate->GetCurrentContext();
  int fd;
  if (!ArgInt(info, 0, "sendmsg", &fd)) return;
  if (!info[1]->IsUint8Array() || !info[2]->IsArray()) {
    return ThrowInvalid(isolate, "sendmsg", "expected (fd, Uint8Array, fds array)");
  }
  Local<Uint8Array> buf = info[1].As<Uint8Array>();
  Local<Array> fdsIn = info[2].As<Array>();
  uint32_t nfds = fdsIn->Length();
  if (nfds > kMaxFds) return ThrowInvalid(isolate, "sendmsg", "more than 32 fds");
  int fdv[kMaxFds];
  for (uint32_t i = 0; i < nfds; i++) {
    Local<Value> v = fdsIn->Get(context, i).ToLocalChecked();
    if (!v->IsInt32()) return ThrowInvalid(isolate, "sendmsg", "fds must be integers");
    fdv[i] = v.As<v8::Int32>()->Value();
  }
  std::shared_ptr<v8::BackingStore> store = buf->Buffer()->GetBackingStore();
  struct iovec iov = {static_cast<char*>(store->Data()) + buf->ByteOffset(), buf->ByteLength()};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fdv, sizeof(int) * nfds);
  }
  ssize_t n;
  do n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return info.GetReturnValue().Set(-1);
    return ThrowErrno(isolate, errno, "sendmsg");
  }
  info.GetReturnValue().Set(static_cast<double>(n));
}

// ---------------------------------------------------------------------------------------------------------------
// fd watchers on the calling thread's event loop (uv_poll). Per-thread state: AddonData.

struct AddonData;

struct Watcher {
  uv_poll_t handle;
  AddonData* addon;
  int id;
  Global<Function> callback;
};

struct AddonData {
  Isolate* isolate;
  Global<Context> context;
  uv_loop_t* loop;
  int nextId = 1;
  std::map<int, Watcher*> watchers;
};

void OnWatcherClosed(uv_handle_t* handle) {
  delete reinterpret_cast<Watcher*>(handle->data);
}

void CloseWatcher(Watcher* w) {
  w->callback.Reset();
  uv_poll_stop(&w->handle);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->handle), OnWatcherClosed);
}

void OnPoll(uv_poll_t* handle, int status, int events) {
  Watcher* w = reinterpret_cast<Watcher*>(handle->data);
  Isolate* isolate = w->addon->isolate;
  HandleScope scope(isolate);
  if (w->callback.IsEmpty()) return;
  Local<Context> context = w->addon->context.Get(isolate);
  Context::Scope context_scope(context);
  Local<Function> fn = w->callback.Get(isolate);
  Local<Value> argv[1] = {Integer::New(isolate, status < 0 ? status : events)};
  // MakeCallback runs microtasks afterwards and reports a thrown exception as uncaught, like any Node callback.
  (void)node::MakeCallback(isolate, context->Global(), fn, 1, argv, node::async_context{0, 0});
}

// watch(fd, events, callback) -> id. events: 1 = readable, 2 = writable (uv_poll's UV_READABLE / UV_WRITABLE).
// callback(events) receives the ready bits, or a negative libuv status on error. The watcher keeps the loop alive.
void Watch(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  AddonData* addon = static_cast<AddonData*>(ExternalValue(info.Data()));
  int fd, events;
  if (!ArgInt(info, 0, "uv_poll_start", &fd) || !ArgInt(info, 1, "uv_poll_start", &events)) return;
  if (!info[2]->IsFunction()) return ThrowInvalid(isolate, "uv_poll_start", "callback must be a function");
  if (fcntl(fd, F_GETFD) < 0) return ThrowErrno(isolate, errno, "uv_poll_init");
  Watcher* w = new Watcher();
  int r = uv_poll_init(addon->loop, &w->handle, fd);
  if (r < 0) {
    delete w;
    return ThrowErrno(isolate, -r, "uv_poll_init");
  }
  w->handle.data = w;
  w->addon = addon;
  w->id = addon->nextId++;
  w->callback.Reset(isolate, info[2].As<Function>());
  r = uv_poll_start(&w->handle, events & (UV_READABLE | UV_WRITABLE), OnPoll);
  if (r < 0) {
    CloseWatcher(w);
    return ThrowErrno(isolate, -r, "uv_poll_start");
  }
  addon->watchers[w->id] = w;
  info.GetReturnValue().Set(w->id);
}

// rewatch(id, events): change the events a watcher waits for (e.g. add writable while output is queued).
void Rewatch(const FunctionCallbackInfo<Value>& info) {
  AddonData* addon = static_cast<AddonData*>(ExternalValue(info.Data()));
  int id, events;
  if (!ArgInt(info, 0, "uv_poll_start", &id) || !ArgInt(info, 1, "uv_poll_start", &events)) return;
  auto it = addon->watchers.find(id);
  if (it == addon->watchers.end()) return ThrowInvalid(info.GetIsolate(), "uv_poll_start", "unknown watcher");
  int r = uv_poll_start(&it->second->handle, events & (UV_READABLE | UV_WRITABLE), OnPoll);
  if (r < 0) return ThrowErrno(info.GetIsolate(), -r, "uv_poll_start");
}

// unwatch(id): stop and release a watcher. Unknown ids are ignored (idempotent). Call it before closing the fd.
void Unwatch(const FunctionCallbackInfo<Value>& info) {
  AddonData* addon = static_cast<AddonData*>(ExternalValue(info.Data()));
  int id;
  if (!ArgInt(info, 0, "uv_poll_stop", &id)) return;
  auto it = addon->watchers.find(id);
  if (it == addon->watchers.end()) return;
  Watcher* w = it->second;
  addon->watchers.erase(it);
  CloseWatcher(w);
}

// The thread's environment is going away (worker exit, process exit): close every watcher so libuv's loop can
// close. The Globals are reset first; they must not outlive the isolate.
void CleanupAddon(void* arg) {
  AddonData* addon = static_cast<AddonData*>(arg);
  for (auto& entry : addon->watchers) CloseWatcher(entry.second);
  addon->watchers.clear();
  addon->context.Reset();
  delete addon;
}

void SetMethod(Isolate* isolate, Local<Context> context, Local<Object> exports, const char* name,
               v8::FunctionCallback fn, Local<Value> data) {
  Local<Function> f = FunctionTemplate::New(isolate, fn, data)->GetFunction(context).ToLocalChecked();
  f->SetName(Str(isolate, name));
  exports->Set(context, Str(isolate, name), f).Check();
}

}  // namespace

NODE_MODULE_INIT(/* exports, module, context */) {
  // Context::GetIsolate() is gone in V8 14 (Node 26); the isolate loading the addon is the current one.
  Isolate* isolate = Isolate::GetCurrent();
  AddonData* addon = new AddonData();
  addon->isolate = isolate;
  addon->context.Reset(isolate, context);
  addon->loop = node::GetCurrentEventLoop(isolate);
  node::AddEnvironmentCleanupHook(isolate, CleanupAddon, addon);
  Local<Value> data = NewExternal(isolate, addon);

  SetMethod(isolate, context, exports, "memfdCreate", MemfdCreate, data);
  SetMethod(isolate, context, exports, "mapShared", MapShared, data);
  SetMethod(isolate, context, exports, "revoke", Revoke, data);
  SetMethod(isolate, context, exports, "isRevoked", IsRevoked, data);
  SetMethod(isolate, context, exports, "mappingCount", MappingCount, data);
  SetMethod(isolate, context, exports, "fstat", Fstat, data);
  SetMethod(isolate, context, exports, "close", Close, data);
  SetMethod(isolate, context, exports, "dup", Dup, data);
  SetMethod(isolate, context, exports, "getSeals", GetSeals, data);
  SetMethod(isolate, context, exports, "addSeals", AddSeals, data);
  SetMethod(isolate, context, exports, "eventfd", EventfdCreate, data);
  SetMethod(isolate, context, exports, "isEventfd", IsEventfd, data);
  SetMethod(isolate, context, exports, "eventfdRead", EventfdRead, data);
  SetMethod(isolate, context, exports, "eventfdWrite", EventfdWrite, data);
  SetMethod(isolate, context, exports, "timerfdCreate", TimerfdCreate, data);
  SetMethod(isolate, context, exports, "timerfdArm", TimerfdArm, data);
  SetMethod(isolate, context, exports, "poll", Poll, data);
  SetMethod(isolate, context, exports, "tunOpen", TunOpen, data);
  SetMethod(isolate, context, exports, "tunSetOffload", TunSetOffload, data);
  SetMethod(isolate, context, exports, "copy", Copy, data);
  SetMethod(isolate, context, exports, "listen", Listen, data);
  SetMethod(isolate, context, exports, "accept", Accept, data);
  SetMethod(isolate, context, exports, "connect", Connect, data);
  SetMethod(isolate, context, exports, "socketPair", SocketPair, data);
  SetMethod(isolate, context, exports, "recvmsg", RecvMsg, data);
  SetMethod(isolate, context, exports, "sendmsg", SendMsg, data);
  SetMethod(isolate, context, exports, "watch", Watch, data);
  SetMethod(isolate, context, exports, "rewatch", Rewatch, data);
  SetMethod(isolate, context, exports, "unwatch", Unwatch, data);
  exports->Set(context, Str(isolate, "pageSize"), Integer::New(isolate, static_cast<int>(sysconf(_SC_PAGESIZE))))
      .Check();
}
