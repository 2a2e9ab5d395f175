(module
  (memory (export "memory") 1)
  (data (i32.const 65535) "xy")
  (func (export "_start")))
