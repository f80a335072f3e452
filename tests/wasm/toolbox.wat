;; A WASI (preview1) test program, hand-written so the test suite needs no wasm
;; toolchain. `toolbox COMMAND ARGS...`:
;;   echo WORDS...        words joined by spaces, then a newline
;;   stderr TEXT          TEXT and a newline on stderr
;;   exit N               exits with status N
;;   spin                 loops forever (for timeouts and kills)
;;   cat                  copies stdin to stdout
;;   flood N              N bytes; byte i of the output is i mod 251 (order check)
;;   readfile PATH        copies a file from the pre-opened directory to stdout
;;   writefile PATH TEXT  writes TEXT to a file in the pre-opened directory
;;   grow                 grows memory until refused, then traps (a memory hog)
;;   net                  exits 0 if no descriptor accepts a connection (no network)
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 4)
  ;; 0..63 scratch, 64..127 command names, 1024.. argv pointers, 4096.. argv strings,
  ;; 65536.. a 64 KiB I/O buffer.
  (data (i32.const 64) "echo\00stderr\00exit\00spin\00cat\00flood\00readfile\00writefile\00grow\00net\00")
  (data (i32.const 128) " \n")
  (global $argc (mut i32) (i32.const 0))

  (func $arg (param $i i32) (result i32)
    (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 2)))))

  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))

  (func $streq (param $a i32) (param $b i32) (result i32) (local $ca i32)
    (loop $next
      (local.set $ca (i32.load8_u (local.get $a)))
      (if (i32.ne (local.get $ca) (i32.load8_u (local.get $b))) (then (return (i32.const 0))))
      (if (i32.eqz (local.get $ca)) (then (return (i32.const 1))))
      (local.set $a (i32.add (local.get $a) (i32.const 1)))
      (local.set $b (i32.add (local.get $b) (i32.const 1)))
      (br $next))
    (i32.const 0))

  (func $atoi (param $p i32) (result i32) (local $n i32) (local $c i32)
    (block $done (loop $next
      (local.set $c (i32.load8_u (local.get $p)))
      (br_if $done (i32.or (i32.lt_u (local.get $c) (i32.const 48)) (i32.gt_u (local.get $c) (i32.const 57))))
      (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (i32.sub (local.get $c) (i32.const 48))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br $next)))
    (local.get $n))

  ;; Writes len bytes at p to fd, looping over short writes; returns the WASI errno.
  (func $write (param $fd i32) (param $p i32) (param $len i32) (result i32) (local $err i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $len)))
      (i32.store (i32.const 0) (local.get $p))
      (i32.store (i32.const 4) (local.get $len))
      (local.set $err (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
      (if (local.get $err) (then (return (local.get $err))))
      (local.set $p (i32.add (local.get $p) (i32.load (i32.const 8))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
      (br $next)))
    (i32.const 0))

  (func $write_str (param $fd i32) (param $p i32)
    (drop (call $write (local.get $fd) (local.get $p) (call $strlen (local.get $p)))))

  ;; Copies fd to stdout until end of file.
  (func $copy (param $fd i32) (local $n i32)
    (block $done (loop $next
      (i32.store (i32.const 16) (i32.const 65536))
      (i32.store (i32.const 20) (i32.const 65536))
      (br_if $done (call $fd_read (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
      (local.set $n (i32.load (i32.const 24)))
      (br_if $done (i32.eqz (local.get $n)))
      (drop (call $write (i32.const 1) (i32.const 65536) (local.get $n)))
      (br $next))))

  ;; Opens argv[2] in the pre-opened directory (fd 3); exits 1 with a message on failure.
  (func $open (param $oflags i32) (result i32) (local $err i32)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0)
      (call $arg (i32.const 2)) (call $strlen (call $arg (i32.const 2)))
      (local.get $oflags) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 32)))
    (if (local.get $err) (then
      (call $write_str (i32.const 2) (call $arg (i32.const 2)))
      (drop (call $write (i32.const 2) (i32.const 129) (i32.const 1)))
      (call $proc_exit (i32.const 1))))
    (i32.load (i32.const 32)))

  (func $echo (local $i i32)
    (local.set $i (i32.const 2))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (global.get $argc)))
      (if (i32.gt_u (local.get $i) (i32.const 2))
        (then (drop (call $write (i32.const 1) (i32.const 128) (i32.const 1)))))
      (call $write_str (i32.const 1) (call $arg (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (drop (call $write (i32.const 1) (i32.const 129) (i32.const 1))))

  (func $flood (param $total i32) (local $pos i32) (local $j i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $pos) (local.get $total)))
      (local.set $n (i32.sub (local.get $total) (local.get $pos)))
      (if (i32.gt_u (local.get $n) (i32.const 65536)) (then (local.set $n (i32.const 65536))))
      (local.set $j (i32.const 0))
      (block $filled (loop $fill
        (br_if $filled (i32.ge_u (local.get $j) (local.get $n)))
        (i32.store8 (i32.add (i32.const 65536) (local.get $j))
          (i32.rem_u (i32.add (local.get $pos) (local.get $j)) (i32.const 251)))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $fill)))
      (if (call $write (i32.const 1) (i32.const 65536) (local.get $n)) (then (call $proc_exit (i32.const 2))))
      (local.set $pos (i32.add (local.get $pos) (local.get $n)))
      (br $next))))

  (func $net (local $fd i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $fd) (i32.const 16)))
      (if (i32.eqz (call $sock_accept (local.get $fd) (i32.const 0) (i32.const 40)))
        (then (call $proc_exit (i32.const 1))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br $next))))

  (func (export "_start") (local $cmd i32) (local $fd i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (global.set $argc (i32.load (i32.const 0)))
    (if (i32.lt_u (global.get $argc) (i32.const 2)) (then (call $proc_exit (i32.const 64))))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (local.set $cmd (call $arg (i32.const 1)))
    (if (call $streq (local.get $cmd) (i32.const 64)) (then (call $echo) (return)))
    (if (call $streq (local.get $cmd) (i32.const 69)) (then
      (call $write_str (i32.const 2) (call $arg (i32.const 2)))
      (drop (call $write (i32.const 2) (i32.const 129) (i32.const 1)))
      (return)))
    (if (call $streq (local.get $cmd) (i32.const 76)) (then
      (call $proc_exit (call $atoi (call $arg (i32.const 2))))))
    (if (call $streq (local.get $cmd) (i32.const 81)) (then (loop $forever (br $forever))))
    (if (call $streq (local.get $cmd) (i32.const 86)) (then (call $copy (i32.const 0)) (return)))
    (if (call $streq (local.get $cmd) (i32.const 90)) (then
      (call $flood (call $atoi (call $arg (i32.const 2)))) (return)))
    (if (call $streq (local.get $cmd) (i32.const 96)) (then
      (local.set $fd (call $open (i32.const 0)))
      (call $copy (local.get $fd))
      (drop (call $fd_close (local.get $fd)))
      (return)))
    (if (call $streq (local.get $cmd) (i32.const 105)) (then
      (local.set $fd (call $open (i32.const 9)))
      (drop (call $write (local.get $fd) (call $arg (i32.const 3)) (call $strlen (call $arg (i32.const 3)))))
      (drop (call $fd_close (local.get $fd)))
      (return)))
    (if (call $streq (local.get $cmd) (i32.const 115)) (then
      (loop $more (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      (unreachable)))
    (if (call $streq (local.get $cmd) (i32.const 120)) (then (call $net) (return)))
    (call $proc_exit (i32.const 64))))
