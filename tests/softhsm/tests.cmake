# Integration tests: the real agent and smimectl against a SoftHSM token.
# One ctest per module; each builds its own fixture (fixture.sh) and agent in
# a fresh temporary directory, so they run in parallel (ctest -j).
# Python 3 standard library only; gpgsm and gpg-agent for test_mime.
find_program(SMIME_PYTHON3 NAMES python3 REQUIRED)

set(_softhsm_dir ${CMAKE_CURRENT_LIST_DIR})
# name  timeout (s)
set(_softhsm_tests
  sign 300
  mime 300
  errors 300
  pin 300
  protocol 600
  large 900
  decrypt 600
  cache 300
  hotplug 600
  remote 600)
if(SMIME_SANITIZE)
  set(_softhsm_sanitize 1)
else()
  set(_softhsm_sanitize 0)
endif()

list(LENGTH _softhsm_tests _n)
math(EXPR _last "${_n} - 1")
foreach(_i RANGE 0 ${_last} 2)
  math(EXPR _j "${_i} + 1")
  list(GET _softhsm_tests ${_i} _name)
  list(GET _softhsm_tests ${_j} _timeout)
  add_test(NAME softhsm_${_name}
    COMMAND ${SMIME_PYTHON3} -B ${_softhsm_dir}/test_${_name}.py)
  set_tests_properties(softhsm_${_name} PROPERTIES
    TIMEOUT ${_timeout}
    LABELS softhsm
    ENVIRONMENT "SMIME_AGENT_BIN=$<TARGET_FILE:smime-agent>;SMIMECTL_BIN=$<TARGET_FILE:smimectl>;SMIME_TEST_SANITIZE=${_softhsm_sanitize};PYTHONDONTWRITEBYTECODE=1")
endforeach()
# The longest ones first, so that ctest -j overlaps them with the rest.
set_tests_properties(softhsm_large PROPERTIES COST 100)
set_tests_properties(softhsm_protocol PROPERTIES COST 50)
