(module
  (memory (export "memory") 1)
  (global $g (export "g0") (mut i64) (i64.const 1))
  (func $start (global.set $g (i64.const 2)) (i32.store8 (i32.const 10) (i32.const 1)))
  (start $start)
  (func (export "_start"))
  (func (export "atoll_init") (global.set $g (i64.add (global.get $g) (i64.const 40)))))
